from npr.cli import main

main()
