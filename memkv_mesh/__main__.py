from memkv_mesh.cli import main

raise SystemExit(main())
