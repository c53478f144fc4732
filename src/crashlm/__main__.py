from crashlm.cli import main

main()
