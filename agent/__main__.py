"""``python -m agent`` runs the edge-agent command line."""

from agent.cli import main

main(prog_name="edge-agent")
