"""Wire formats, topics, signatures and verification shared by edge-agent and edge-fleet. Pure: no I/O."""
