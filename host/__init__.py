"""edgepack host side: build pipeline, signing, publish/deploy, fleet tools and the CLI.

``edgepack`` itself is a namespace package: the repository's top-level folders map onto
``edgepack.host``, ``edgepack.agent``, ``edgepack.targets`` and ``edgepack.firmware_configs``.
"""
