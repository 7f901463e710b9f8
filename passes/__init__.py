"""meshweave's passes. Importing this package registers every pass (see registry.py)."""
from meshweave.passes import upstream  # noqa: F401  (registers canonicalize, cse, sdy-*, ...)
from meshweave.passes import auto_sharding, data_parallel, inline_calls, insert_transfers, install_mesh, layer_clustering, stage_construction, stage_outlining, strip_markers  # noqa: F401
from meshweave.passes.pipeline import Pipeline, PipelineState, parse_pipeline  # noqa: F401
from meshweave.passes.registry import REGISTRY, Pass, PassError, PassOptionError, create_pass, list_passes  # noqa: F401
