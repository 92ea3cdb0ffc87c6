from dymoe_gguf.cli import main

main()
