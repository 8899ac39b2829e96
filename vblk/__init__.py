"""vblk: a virtio-blk device backend speaking vhost-user, after ACRN's Virtio-BLK."""
__version__ = "0.1.0"
