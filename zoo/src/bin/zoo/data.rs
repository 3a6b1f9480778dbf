//! `zoo data fetch`: dataset downloads.

/// Downloads, verifies and unpacks a dataset.
pub fn fetch(
    dataset: &str,
    size: &str,
    dest: &std::path::Path,
    mirror: Option<&str>,
) -> Result<(), zoo::Error> {
    if dataset != "imagenette" {
        return Err(zoo::Error::Train(format!(
            "unknown dataset `{dataset}`: expected `imagenette`"
        )));
    }
    let size: zoo::data::fetch::ImagenetteSize = size.parse()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:25}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(size.folder());
    let root = zoo::data::fetch::fetch_imagenette(size, dest, mirror, &mut |done, total| {
        if let Some(total) = total {
            bar.set_length(total);
        }
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    println!(
        "Imagenette is in {} (train with `--data {}`)",
        root.display(),
        root.display()
    );
    Ok(())
}
