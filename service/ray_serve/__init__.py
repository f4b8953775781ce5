"""The same service on Ray Serve, for users who outgrow one machine (``pip install 'ultrafastbert-serve[ray]'``).

* :mod:`service.ray_serve.options`: the Ray knobs (``UFB_RAY_*`` / ``--ray-*``) and the deployment options they
  turn into; free of Ray imports so the CLI can build its flags without the extra installed.
* :mod:`service.ray_serve.discovery`: each replica's own Prometheus endpoint and the registry in Ray's GCS that
  lists the live ones (Prometheus ``http_sd_configs``).
* :mod:`service.ray_serve.deployment`: the ``@serve.ingress`` deployment around ``service.app.create_app``, the
  application builder for ``serve run`` / ``serve deploy``, and ``ultrafastbert serve --ray``.

Nothing outside this package imports it, so the single-process service never imports ``ray``.
"""
