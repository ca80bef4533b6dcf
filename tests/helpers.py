"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""


class Log:
    """Collects log messages: a ``log`` callable whose lines can be read back."""

    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(str(msg))

    @property
    def text(self):
        return "\n".join(self.lines)
