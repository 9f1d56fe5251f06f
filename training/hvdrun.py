"""``horovodrun``, less the probe it runs before every launch once the caller has done it.

    python -m ringflow.training.hvdrun --gloo-checked <horovodrun arguments>

Before it starts a Gloo job, horovodrun asks whether Horovod was built with Gloo by forking a
process that imports ``horovod.torch``, and with it torch (``horovod.common.util.gloo_built``): 2.4 of
the launcher's 2.6 s on 2 cores, about 40% of the ranks' start-up on the default config
(``benchmarks/README.md``). The train task has just asked the same question in its own process
(:func:`ringflow.training.launch.check_horovod`, where torch is imported anyway), so it passes
``--gloo-checked`` and the launcher takes that answer instead of asking again. Without the flag
this is plain ``horovodrun``. Everything else (argument parsing, the Gloo rendezvous, elastic
mode, the launch itself) is horovodrun's own ``run_commandline``.
"""

from __future__ import annotations

import sys

GLOO_CHECKED = "--gloo-checked"


def main(argv: list[str] | None = None) -> int | None:
    from horovod.runner import launch

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [GLOO_CHECKED]:
        args = args[1:]

        def gloo_built(verbose: bool = False) -> bool:
            return True  # checked by the caller (check_horovod), in this installation

        launch.gloo_built = gloo_built  # the name run_controller and the elastic launch look up
    sys.argv = ["horovodrun", *args]
    rc: int | None = launch.run_commandline()
    return rc


if __name__ == "__main__":
    sys.exit(main())
