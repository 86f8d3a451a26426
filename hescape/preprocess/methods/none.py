"""``none``: library-size normalisation and log1p, nothing corrected."""

from __future__ import annotations

from hescape.preprocess.expression import MethodInput, MethodOutput
from hescape.preprocess.spec import MethodSpec, register


def run(inp: MethodInput, opts: None) -> MethodOutput:
    """Normalised log expression of the selected genes (N x G)."""
    x = inp.log_expression()
    genes = inp.genes(x)
    return MethodOutput(X=x[:, genes], feature_names=inp.gene_names(genes),
                        info={"n_genes": int(len(genes))})


SPEC = register(MethodSpec(
    name="none",
    summary="log-normalised expression, no correction",
    run=run,
    heldout="nothing is fitted except the gene selection (on training rows)",
    output="expression",
    fits=False,
))
