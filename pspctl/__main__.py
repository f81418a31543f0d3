from pspctl.cli import main

main()
