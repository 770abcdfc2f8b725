"""`python -m calid` runs the `calid` command."""

from calid.cli import main

raise SystemExit(main())
