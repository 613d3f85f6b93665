"""The `loralab` command line: a torch-free grammar, and one module per group of commands.

    main      the command table (command -> module), `build_parser`, `main`
    parsers   every command's options, description and examples (torch-free)
    help      TrainConfig's fields as options (`add_config_options`), defaults in --help
    common    what commands share: description/epilog, the RUN / --run argument
    train     train                 evaluate  eval            score     score
    targets   targets               compare   compare, runs, report
    models    merge, generate       data      data            setup     setup
    studies   studies (+ compare --dry-run)                   env       env

Each command module's `RUN[command](args)` runs the command and returns its exit code.
"""
