"""The end of a rank started by torch.multiprocessing (spawn) once its work is done.

Why not a normal return: a spawned gloo rank aborts now and then at interpreter teardown, after its
process group has been destroyed ("terminate called without an active exception", then SIGABRT: a
native thread still joinable when static destructors run). Measured with bench/bench_cp.py: 8 of 90
runs aborted, 3 of 30 with a barrier before the teardown, 0 of 30 leaving through here. The rank's
results are written and its group destroyed by then, so it leaves without running those destructors."""
from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_spawned_rank(code: int = 0) -> NoReturn:
    """Also how a launched rank (`fwl train`, `fwl eval`) leaves after an error once its group is destroyed:
    measured on two loaded cores, a bad-data exit 2 became a SIGABRT there too (1 of 6 suite runs)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
