"""`python -m lladapter_ext ...` is the `lladapter` command."""
from .cli import main

raise SystemExit(main())
