"""`trl-midalign demo`: the command's entry; the demo itself is [`trl_midalign.demo.run.run_demo`]."""

from ..demo.arguments import DemoArguments


__all__ = ["DemoArguments", "run_demo"]


def run_demo(args: DemoArguments) -> dict:
    """Run `trl-midalign demo` (imports the demo, and with it the trainer, only when it runs)."""
    from ..demo.run import run_demo as demo

    return demo(args)
