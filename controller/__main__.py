"""``python -m controller`` runs the edge-fleet command line."""

from controller.cli import main

if __name__ == "__main__":  # not when a worker process (controller.audit_shards) imports this as its main module
    main(prog_name="edge-fleet")
