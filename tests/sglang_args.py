"""What `sglang.launch_server` makes of a command line before it starts any process, on the CPU.

`server_args(argv)` runs sglang 0.5.23's own `prepare_server_args` (its parser) and
`ServerArgs.resolve_once()` (its resolution pipeline: the checks that refuse a bad
combination, and the values it derives, e.g. EPLB's dispatch settings or DP attention's
chunked-prefill size). Parsing alone checks nothing beyond argparse: `ServerArgs.__post_init__`
is empty in 0.5.23. Resolution reads the model's config.json (it needs `architectures`) and runs
as on a GPU node (`--device cuda`: this machine has none). The first call takes seconds
(SGLang's imports), later ones milliseconds.
"""

import logging
import warnings
from typing import Any


def server_args(argv: list[str]) -> Any:
    """SGLang's `ServerArgs` for `argv`, resolved (a refused combination raises here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its CPU-only import warns about CUDA kernels
        from sglang.srt.server_args import prepare_server_args

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # prepare_server_args reconfigures the root logger (force=True): keep pytest's
        args = prepare_server_args([*argv, "--device", "cuda"])
        args.resolve_once()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return args


def resolved(argv: list[str]) -> Any:
    """The server's settings as resolved from `argv` (a read-only view of every field)."""
    from sglang.srt.arg_groups.overrides import resolved_view

    return resolved_view(server_args(argv))


def resolved_fields(argv: list[str]) -> dict[str, Any]:
    """Every server setting resolved from `argv`, by field name (comparable with ==)."""
    from sglang.srt.arg_groups.arg_utils import record_fields
    from sglang.srt.arg_groups.overrides import resolved_view

    args = server_args(argv)
    view = resolved_view(args)
    return {f.name: getattr(view, f.name) for f in record_fields(type(args))}
