"""privbroker's root side: the loop (core/), the policy (policy/), files
(files/), network resources (net/) and the commands (admin/); docs/design.md.

It is installed as `privbroker.broker` and nothing else: run from a checkout
as `broker`, its modules would be loaded a second time beside the installed
ones (and its native fast path not at all)."""

if __name__ != "privbroker.broker":
    raise ImportError(
        f"the broker is the package privbroker.broker, not {__name__}: "
        "install the checkout (pip install -e '.[broker]') and use `privbroker` "
        "or `python3 -m privbroker.broker`"
    )
