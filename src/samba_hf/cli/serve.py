"""`samba-hf serve`: transformers' own `serve` command (an OpenAI-compatible server, the one
`transformers chat` talks to), able to load Samba models.

transformers' serve builds the model class from its name, `getattr(transformers,
config.architectures[0])`, so a model whose class lives outside the `transformers` namespace fails
there ("module transformers has no attribute SambaForCausalLM"), with `--trust-remote-code` or a
registered Auto class alike. This command adds samba-hf's classes to that namespace (also in the process
where transformers 5.25 and later load each model: `serve_loader`), then runs transformers' serve with the
options it is given: `samba-hf serve --help` lists them.
"""

from .options import UsageError


def add_parser(commands, formatter) -> None:
    parser = commands.add_parser(
        "serve",
        help="transformers' OpenAI-compatible server (transformers serve), with Samba models loadable",
        description=__doc__,
        formatter_class=formatter,
        add_help=False,
    )
    parser.set_defaults(run=run, passes_unknown_options=True)


def expose_to_transformers(namespace=None) -> list[str]:
    """Make samba-hf's model and config classes attributes of the `transformers` module (or of `namespace`,
    the module object serve holds), where `transformers serve` looks a model's architecture up by name.
    Returns the names added."""
    import samba_hf

    if namespace is None:
        import transformers as namespace

    added = []
    for name in ("SambaConfig", "SambaModel", "SambaForCausalLM", "SambaForSequenceClassification"):
        if getattr(namespace, name, None) is not getattr(samba_hf, name):
            setattr(namespace, name, getattr(samba_hf, name))
            added.append(name)
    return added


def run(args) -> int:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise UsageError("serving needs FastAPI, Uvicorn, pydantic and openai: pip install 'transformers[serving]'")
    from transformers.cli.serving import model_manager
    from transformers.cli.transformers import app

    expose_to_transformers()
    if hasattr(model_manager, "ModelLoader"):  # serve builds its loader from this name when it starts
        from .serve_loader import SambaModelLoader

        model_manager.ModelLoader = SambaModelLoader
    app(args=["serve", *args.passed_on], prog_name="samba-hf")  # exits with click's code (2: a bad option)
    return 0
