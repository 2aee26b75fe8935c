"""`make test`: run pytest and treat "no tests collected" (exit 5) as the failure it is for us."""

from __future__ import annotations

import sys

import pytest

NO_TESTS_COLLECTED = 5


def main(argv: list[str]) -> int:
    code = int(pytest.main(argv))
    if code == NO_TESTS_COLLECTED:
        print("make test: pytest collected no tests; a suite that runs nothing is a failure",
              file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
