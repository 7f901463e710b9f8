"""meshweave's intra-operator sharding solver (the IOPDDL problem).

Pick one sharding strategy per node so that node costs plus edge (resharding)
costs are minimal and the memory live at every time point stays under the
limit. The problem is a plain data object (``ShardingProblem``) that the
auto-sharding pass builds and that reads from / writes to the IOPDDL contest
JSON; ``evaluate`` scores an assignment exactly; ``solve`` returns the best
assignment it finds within a time limit (exact ILP for small problems, exact
reductions + Lagrangian/message-passing search + ILP neighbourhoods for big ones).
"""

from .evaluate import Evaluation, evaluate
from .iopddl import read_iopddl, write_iopddl
from .cache import SolveCache
from .problem import INF_COST, ShardingProblem
from .portfolio import WorkerReport
from .solve import Solution, min_peak_usage, solve

__all__ = [
    "INF_COST",
    "ShardingProblem",
    "read_iopddl",
    "write_iopddl",
    "Evaluation",
    "evaluate",
    "Solution",
    "solve",
    "min_peak_usage",
    "SolveCache",
    "WorkerReport",
]
