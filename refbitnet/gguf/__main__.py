"""``python -m refbitnet.gguf {info,export}``: see refbitnet.gguf.cli."""

from .cli import main

raise SystemExit(main())
