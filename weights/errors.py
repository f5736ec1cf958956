"""The one exception type of the weight path, and how its messages list names."""


class WeightSyncError(Exception):
    """A weight transfer cannot go ahead or did not complete.

    Not a `UserError`: it means the trainer and the engines disagree about the model (names,
    shapes, dtypes), a peer of the broadcast group is missing, or the transfer broke. The fix is
    in code or infrastructure, so the traceback is worth keeping. The message names the group,
    the tensors or the ranks involved.
    """


MAX_EXAMPLES = 5
"""How many names one line of an error lists before it gives only a count of the rest."""


def name_list(names: list[str]) -> str:
    """`a, b, c, d, e, ... and 7 more`: error messages stay short for models of 20k tensors."""
    shown = ", ".join(names[:MAX_EXAMPLES])
    rest = len(names) - MAX_EXAMPLES
    return f"{shown}, ... and {rest} more" if rest > 0 else shown
