"""Reference numbers for the bundled IOPDDL instances.

Transcribed from ``../shared/iopddl/README.md`` (sections 3, 4 and 6), which takes
them from the contest results table (``iopddl_final_results.csv``, ti2-group/
iopddl_experiments; best known = minimum over team rows, XLA = the XLA row) and
from evaluating the files. Points for an instance are best known / our cost.
"""

INSTANCES = ("A", "B", "G", "K", "M", "P", "S", "V")

FILE = "asplos-2025-iopddl-{}.json.gz"

TIME_LIMIT_S = {"A": 60, "B": 60, "G": 120, "K": 180, "M": 180, "P": 240, "S": 240, "V": 300}
"""Contest time limit per instance (on an 8-core, 32 GB machine)."""

BEST_TEAM_COST = {
    "A": 6_548_641_531,
    "B": 532_843,
    "G": 217_039,
    "K": 2_274_276_676,
    "M": 49_928_460_991,
    "P": 662_197_407_330,
    "S": 1_534_613_444,
    "V": 1_632_051,
}

XLA_COST = {
    "A": 13_214_846_074,
    "B": 990_205,
    "G": 1_264_777,
    "P": 651_833_115_436,
}
"""XLA's cost where it found a scored plan (none on K, M, S, V)."""

BEST_KNOWN_COST = {k: min(v, XLA_COST.get(k, v)) for k, v in BEST_TEAM_COST.items()}
"""The scoring reference: the best team cost, or XLA's where lower (P)."""

TEST_VECTORS = {
    # name: all-zero (cost, peak, within limit), min-usage (cost, peak, within limit)
    "A": {"all_zero": (6_916_000_000_020_231_139_720, 2_149_598_636, False),
          "min_usage": (6_546_000_000_061_623_391_442, 429_571_388, True)},
    "B": {"all_zero": (1_000_000_000_657_849_255, 44_346_928, False),
          "min_usage": (35_000_000_001_339_941_579, 13_084_116, True)},
    "G": {"all_zero": (9_000_000_002_307_013_723, 80_075_852, False),
          "min_usage": (13_000_000_000_437_641_412, 13_084_112, True)},
    "K": {"all_zero": (1_300_000_000_021_718_286_624, 4_115_519_912, False),
          "min_usage": (930_000_000_063_170_607_368, 429_430_072, True)},
    "M": {"all_zero": (5_504_860_803_348, 94_764_750_072, False),
          "min_usage": (2_696_000_008_928_467_754_854, 22_378_296_408, True)},
    "P": {"all_zero": (2_202_302_096_509, 162_971_972_510, True),
          "min_usage": (693_000_002_202_115_097_665, 162_971_972_510, True)},
    "S": {"all_zero": (664_000_000_021_762_841_437, 2_192_810_580, False),
          "min_usage": (534_000_000_053_438_003_476, 273_396_640, True)},
    "V": {"all_zero": (9_000_000_000_774_208_499, 80_075_852, False),
          "min_usage": (42_000_000_002_060_978_388, 13_139_244, True)},
}

IOPDDL_DIR_ENV = "MESHWEAVE_IOPDDL_DIR"


def search_dirs(repo) -> list:
    """Where the instance files are looked for: ``$MESHWEAVE_IOPDDL_DIR``, the repository's
    ``tests/data/iopddl`` (example, B and G only) and ``../shared/iopddl`` beside it."""
    import os
    from pathlib import Path

    repo = Path(repo)
    dirs = [Path(os.environ[IOPDDL_DIR_ENV])] if os.environ.get(IOPDDL_DIR_ENV) else []
    return dirs + [repo / "tests" / "data" / "iopddl", repo.parent / "shared" / "iopddl"]


def find_instance(name: str, repo):
    """Path of instance ``name`` (a letter, or a file name) or None when no search dir has it."""
    fname = name if "." in name else FILE.format(name)
    for d in search_dirs(repo):
        if (d / fname).is_file():
            return d / fname
    return None
