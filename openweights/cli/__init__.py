"""The `ow` command line (`openweights.cli.main:main`)."""
