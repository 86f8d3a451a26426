"""Paired data: the canonical dataset contract, validation, simulator, splits, importers."""

from hescape.data.contract import (
    DatasetWriter,
    PairedData,
    load_paired,
    write_dataset,
)
from hescape.data.describe import describe
from hescape.data.errors import DataError
from hescape.data.importers import (
    VisiumSample,
    import_generic,
    import_hescape,
    import_hest,
    import_visium,
    read_sample_sheet,
)
from hescape.data.simulate import simulate, simulate_expression, tiny_dataset
from hescape.data.splits import check_split, leave_one_donor_out, make_split, read_split_file
from hescape.data.validate import harmonise_genes, validate_adata, validate_patches

__all__ = [
    "DataError", "DatasetWriter", "PairedData", "VisiumSample", "check_split", "describe",
    "harmonise_genes", "import_generic", "import_hescape", "import_hest", "import_visium",
    "read_sample_sheet",
    "leave_one_donor_out", "load_paired", "make_split", "read_split_file", "simulate",
    "simulate_expression", "tiny_dataset", "validate_adata", "validate_patches", "write_dataset",
]
