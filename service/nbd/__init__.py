"""vblk's NBD front end: the sans-I/O protocol core (both directions), connections and the server.

Service layer: every request ends up at the disk port, and through it on the virtqueues.
"""
