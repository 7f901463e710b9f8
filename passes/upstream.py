"""Upstream MLIR passes (built into jaxlib), registered under their own names."""
from meshweave.passes.registry import register_upstream

_MODULE = [
    ("canonicalize", "Canonicalize ops (upstream MLIR)"),
    ("cse", "Eliminate common subexpressions (upstream MLIR)"),
    ("symbol-dce", "Delete unreferenced private symbols (upstream MLIR)"),
    ("sdy-propagation-pipeline", "Shardy: import, propagate shardings to every op, export (upstream)"),
    ("sdy-export-pipeline", "Shardy: export shardings; enable-insert-explicit-collectives=true makes collectives explicit (upstream)"),
    ("sdy-import-pipeline", "Shardy: import pipeline run before propagation (upstream)"),
    ("sdy-basic-propagate", "Shardy: basic sharding propagation without priorities (upstream)"),
    ("sdy-aggressive-propagate", "Shardy: aggressive sharding propagation (upstream)"),
    ("sdy-close-shardings", "Shardy: close every open tensor sharding (upstream)"),
    ("sdy-drop-sharding-and-mesh", "Shardy: remove all shardings and meshes (upstream)"),
]
_FUNC = [
    ("sdy-populate-op-sharding-rules", "Shardy: attach the op sharding rule (factor mapping) to every op (upstream)"),
    ("sdy-insert-explicit-reshards", "Shardy: insert sdy.reshard where shardings disagree (upstream)"),
    ("sdy-reshard-to-collectives", "Shardy: lower sdy.reshard to explicit collectives (upstream)"),
]

for _name, _summary in _MODULE:
    register_upstream(_name, _summary)
for _name, _summary in _FUNC:
    register_upstream(_name, _summary, anchor="func.func")
