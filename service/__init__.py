"""vblk's front ends and process: CLI, configuration, lifecycle (NBD, REST and metrics to come).

The top of the stack: everything here reaches the disk through :class:`driver.blk.VirtioBlk`.
"""
