"""dicomnode: an AI node beside a hospital PACS.

The path of an image through the node is the package layout::

    receive -> store -> queue -> studies -> imaging -> models -> explain
            -> encode -> send

``pipeline`` writes that flow down in one place; ``worker`` and ``service``
run it; ``cli`` is the only entry point that configures logging.
"""

__version__ = "0.1.0"
