"""One module per `qkvcomm` command (or family of commands): each `register(sub)` adds its
parser(s) and sets `run`, the function `main` calls with the parsed arguments."""
