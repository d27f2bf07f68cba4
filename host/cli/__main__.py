from edgepack.host.cli.main import main

main()
