"""The errors a run reports to a person, and the process exit codes they map to.

Exit codes besides 0: 2 a user's mistake or a failed read/write (the message
says what to fix), 3 training diverged, 4 done but incomplete (some inputs of
``-super_resolve`` were skipped and the others written, or a training run's
validation could not score every validation subject), 128 + N a stop signal
N (143 for SIGTERM, 138 for SIGUSR1), 130 Ctrl-C.
"""

EXIT_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PARTIAL = 4
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake in the command line or the files it names; reported without a traceback."""


class RunStopped(Exception):
    """A run that stopped on purpose: a stop signal, divergence, a failed read or write.

    Its message is the paragraph a person reads: what happened, what was
    saved, how to continue. ``exit_code`` is the process's exit status.
    """

    def __init__(self, message, exit_code=EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code
