"""vblk's NBD front end: the sans-I/O protocol core and the asyncio server that moves its bytes.

Service layer: every request ends up as a VirtioBlk call, through the virtqueues.
"""
