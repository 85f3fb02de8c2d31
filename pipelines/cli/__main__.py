from prefixfleet.pipelines.cli import main

main()
