from privtune.cli import main

main()
