"""vblk's front ends and process: NBD, REST, metrics and the ring view; configuration, lifecycle.

The top of the stack: the front ends reach a disk only through the disk port
(:class:`service.blockio.ByteDisk`), which reaches it through :class:`driver.blk.VirtioBlk`.
"""
