"""``python -m controller`` runs the edge-fleet command line."""

from controller.cli import main

main(prog_name="edge-fleet")
