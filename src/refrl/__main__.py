"""``python -m refrl`` (what ``accelerate launch -m refrl`` runs)."""

from refrl.cli import main

main()
