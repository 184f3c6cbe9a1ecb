from qlora_pipeline.cli import main

raise SystemExit(main())
