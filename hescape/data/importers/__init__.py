"""Importers: every source format converts into the canonical dataset."""

from hescape.data.importers.generic import import_generic, read_expression
from hescape.data.importers.hescape_arrow import import_hescape
from hescape.data.importers.hest import import_hest
from hescape.data.importers.visium import VisiumSample, import_visium, read_sample_sheet

__all__ = ["VisiumSample", "import_generic", "import_hescape", "import_hest", "import_visium",
           "read_expression", "read_sample_sheet"]
