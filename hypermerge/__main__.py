from hypermerge.cli import main

main()
