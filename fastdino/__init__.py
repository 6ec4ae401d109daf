"""fastdino: fast DINO self-supervised training.

Importing ``fastdino`` is cheap on purpose; the subpackages (``fastdino.ops`` first) pull in
only what they need.
"""

__version__ = "0.1.0"
