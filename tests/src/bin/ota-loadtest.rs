//! `ota-loadtest`: see `ota_tests::loadtest`.

use clap::Parser;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = ota_tests::loadtest::Args::parse();
    let out = args.out.clone();
    match ota_tests::loadtest::run(args).await {
        Ok((report, ok)) => {
            print!("{}", report.table());
            if let Err(e) = report.write(&out) {
                eprintln!("ota-loadtest: writing the report: {e:#}");
            } else {
                println!(
                    "  report: {0}/report.json, chart: {0}/chart.svg",
                    out.display()
                );
            }
            if !ok {
                for v in report.violations() {
                    eprintln!("ota-loadtest: INVARIANT VIOLATED: {v}");
                }
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("ota-loadtest: error: {e:#}");
            std::process::exit(2);
        }
    }
}
