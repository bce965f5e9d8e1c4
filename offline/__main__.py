from vllm_aser_offline.cli import main

raise SystemExit(main())
