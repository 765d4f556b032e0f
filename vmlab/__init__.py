"""vmlab: reproduce and diagnose host memory mapped into KVM guests (dma-buf x KVM)."""
__version__ = "0.1.0"
