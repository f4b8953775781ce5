from engine.bench.suite import main

main()
