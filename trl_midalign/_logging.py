"""The package's one logger style: accelerate's logger, which logs once per process group (main process by default).

accelerate's `get_logger` refuses to log before an accelerate state exists (a probe run in a notebook, a collator
used on its own); the logger made here then logs as the single process it is. Its lines carry accelerate's
`[RANK n]` prefix only in multi-process runs.
"""

import logging

from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState


class _Adapter(MultiProcessAdapter):
    def process(self, msg, kwargs):
        if PartialState().num_processes > 1:
            return super().process(msg, kwargs)
        kwargs.setdefault("stacklevel", 2)
        return msg, kwargs

    def log(self, level, msg, *args, **kwargs):
        if not PartialState._shared_state:  # no accelerate state yet: a single process
            kwargs.pop("main_process_only", None)
            kwargs.pop("in_order", None)
            if self.isEnabledFor(level):
                kwargs.setdefault("stacklevel", 2)
                self.logger.log(level, msg, *args, **kwargs)
            return
        super().log(level, msg, *args, **kwargs)


def get_logger(name: str) -> logging.LoggerAdapter:
    """
    accelerate's multi-process logger for `name` (pass `main_process_only=False` to log on every process), usable
    before any accelerate state exists.
    """
    return _Adapter(logging.getLogger(name), {})
