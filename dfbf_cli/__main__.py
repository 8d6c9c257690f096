from dfbf_cli.cli import main

main()
