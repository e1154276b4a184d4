from relicv2_cli.cli import main

main()
