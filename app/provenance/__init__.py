"""Marks that say an image was generated, and reading them back.

- ``labels``: the IPTC digital source type in XMP (``trainedAlgorithmicMedia``), always written;
- ``credentials``: C2PA content credentials signed with the deployment's certificate (c2pa-python);
- ``watermark``: an invisible watermark in the pixels (invisible-watermark, worker extra only);
- ``verify``: what an image carries of each, for ``diffq verify`` and ``POST /v1/verify``.

Torch-free: the API imports it for verification; ``watermark`` imports its library (which imports
torch) only when called.
"""
